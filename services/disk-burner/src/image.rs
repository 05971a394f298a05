//! Images to burn: the manifest (size, BLAKE3, block map) and the file the bytes are read from.
//!
//! The block map lists the 4 KiB-aligned ranges of the image file that hold data (found with
//! `SEEK_DATA`/`SEEK_HOLE`, as `mkfs.ext4 -d` leaves unused blocks as holes in a sparse file).
//! Only those ranges are written and verified: what a filesystem does not use does not matter,
//! as with bmaptool. Each range carries its own BLAKE3, so a verify names the range that differs.
//!
//! An image from the store is loaded against its manifest ([`Image::load_stored`]): the manifest's
//! signature first (when the burner trusts keys: [`crate::sign`]), then the file's size and every
//! range's BLAKE3, and the whole-image BLAKE3 from those ranges, before any drive is touched. A
//! bare file ([`Image::load`]) has no manifest to be checked against; it must at least be an ext4
//! file system whose blocks fit in the file.

use serde::{Deserialize, Serialize};
use std::os::unix::fs::FileExt;
use std::path::Path;

pub const BLOCK: u64 = 4096;
pub const MANIFEST_FORMAT: &str = "motorpool.image.v1";

/// One mapped range.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Range {
    pub offset: u64,
    pub len: u64,
    pub blake3: String,
}

/// What an image is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageManifest {
    pub format: String,
    /// At most 27 characters of `[A-Za-z0-9._-]` (it names the GPT partition).
    pub id: String,
    pub size: u64,
    /// BLAKE3 of the whole image, holes read as zeros.
    pub blake3: String,
    pub block_size: u64,
    pub ranges: Vec<Range>,
    /// The ranges cut into pieces of at most [`PIECE`] bytes: what moves between the platform's
    /// CAS and a burner host ([`crate::depot`]), each with its BLAKE3 (checked as it arrives) and
    /// its SHA-256 (its CAS digest). Manifests from before pieces have none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pieces: Vec<Piece>,
}

/// The unit of transfer of an image: a slice of one range.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Piece {
    pub offset: u64,
    pub len: u64,
    pub blake3: String,
    pub sha256: String,
}

/// The largest piece: small enough that a changed file costs little to fetch again, large enough
/// that a gigabyte is a thousand calls.
pub const PIECE: u64 = 1 << 20;

impl ImageManifest {
    pub fn mapped_bytes(&self) -> u64 {
        self.ranges.iter().map(|r| r.len).sum()
    }
}

pub use motorpool_messages::fleet::valid_id;

/// The data extents of a file, rounded out to whole blocks and merged.
pub fn data_extents(file: &std::fs::File, size: u64) -> std::io::Result<Vec<(u64, u64)>> {
    use nix::unistd::{Whence, lseek};
    let mut out: Vec<(u64, u64)> = Vec::new();
    let mut pos: i64 = 0;
    while (pos as u64) < size {
        let start = match lseek(file, pos, Whence::SeekData) {
            Ok(s) => s,
            Err(nix::errno::Errno::ENXIO) => break,
            // A file system without SEEK_DATA: everything is data.
            Err(nix::errno::Errno::EINVAL) => return Ok(vec![(0, size.div_ceil(BLOCK) * BLOCK)]),
            Err(e) => return Err(e.into()),
        };
        let end = lseek(file, start, Whence::SeekHole).map_err(std::io::Error::from)?;
        let (a, b) = (
            (start as u64) / BLOCK * BLOCK,
            (end as u64).div_ceil(BLOCK) * BLOCK,
        );
        match out.last_mut() {
            Some(last) if last.0 + last.1 >= a => last.1 = last.1.max(b - last.0),
            _ => out.push((a, b - a)),
        }
        pos = end;
    }
    Ok(out)
}

/// Why an image was refused before burning.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{path}: {source}")]
    Io {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Refused {
        path: std::path::PathBuf,
        reason: String,
    },
}

fn refused(path: &Path, reason: impl Into<String>) -> ImageError {
    ImageError::Refused {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

fn io_at(path: &Path) -> impl FnOnce(std::io::Error) -> ImageError + '_ {
    move |source| ImageError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Checks that `head` (the image's first 4 KiB at least) starts an ext4 file system whose blocks
/// fit in `size` bytes.
pub fn check_ext4(head: &[u8], size: u64) -> Result<(), String> {
    if head.len() < 2048 || head[1080..1082] != [0x53, 0xef] {
        return Err("not an ext4 file system (no superblock magic at byte 1080)".into());
    }
    let le32 =
        |i: usize| u32::from_le_bytes([head[i], head[i + 1], head[i + 2], head[i + 3]]) as u64;
    let log = le32(1024 + 24);
    if log > 6 {
        return Err(format!(
            "corrupt ext4 superblock (block size 2^{})",
            10 + log
        ));
    }
    let blocks = le32(1024 + 4) | (le32(1024 + 0x150) << 32);
    let needed = blocks << (10 + log);
    if needed > size {
        return Err(format!(
            "truncated: the file system needs {needed} bytes, the file has {size}"
        ));
    }
    Ok(())
}

impl ImageManifest {
    /// The manifest's own consistency: format, id, ranges in order, inside the image, on blocks.
    pub fn check(&self) -> Result<(), String> {
        if self.format != MANIFEST_FORMAT {
            return Err(format!(
                "manifest format {:?}, expected {MANIFEST_FORMAT}",
                self.format
            ));
        }
        if !valid_id(&self.id) {
            return Err(format!("image id {:?} is not valid", self.id));
        }
        if self.block_size != BLOCK {
            return Err(format!("block size {}, expected {BLOCK}", self.block_size));
        }
        let mut end = 0;
        for r in &self.ranges {
            if r.offset < end
                || r.len == 0
                || r.offset % BLOCK != 0
                || r.len % BLOCK != 0
                || r.offset + r.len > self.size.div_ceil(BLOCK) * BLOCK
            {
                return Err(format!(
                    "manifest range {}+{} is out of place",
                    r.offset, r.len
                ));
            }
            end = r.offset + r.len;
        }
        if !self.pieces.is_empty() {
            let mut want = self.ranges.iter().flat_map(|r| {
                (0..r.len.div_ceil(PIECE))
                    .map(move |k| (r.offset + k * PIECE, (r.len - k * PIECE).min(PIECE)))
            });
            for p in &self.pieces {
                if want.next() != Some((p.offset, p.len)) {
                    return Err(format!(
                        "manifest piece {}+{} does not follow its ranges",
                        p.offset, p.len
                    ));
                }
            }
            if want.next().is_some() {
                return Err("the manifest's pieces do not cover its ranges".into());
            }
        }
        Ok(())
    }
}

/// Bytes read at a time while hashing.
const READ: usize = 1 << 20;

/// Feeds `gap` zero bytes (a hole) to `h`.
fn hash_zeros(h: &mut blake3::Hasher, mut gap: u64) {
    static ZEROS: [u8; 64 << 10] = [0; 64 << 10];
    while gap > 0 {
        let n = gap.min(ZEROS.len() as u64) as usize;
        h.update(&ZEROS[..n]);
        gap -= n as u64;
    }
}

/// Hashes one range of `file` (bytes past `size` read as zeros, as the block map rounds the last
/// range up to a whole block) into its own hasher and the whole image's; with `pieces`, also
/// cuts it into [`Piece`]s.
fn hash_range(
    file: &std::fs::File,
    size: u64,
    offset: u64,
    len: u64,
    whole: &mut blake3::Hasher,
    buf: &mut [u8],
    mut pieces: Option<&mut Vec<Piece>>,
) -> std::io::Result<String> {
    use sha2::Digest;
    let mut own = blake3::Hasher::new();
    let mut at = offset;
    while at < offset + len {
        let n = ((offset + len - at) as usize).min(buf.len());
        let readable = (n as u64).min(size.saturating_sub(at)) as usize;
        file.read_exact_at(&mut buf[..readable], at)?;
        buf[readable..n].fill(0);
        own.update(&buf[..n]);
        whole.update(&buf[..readable]);
        if let Some(p) = pieces.as_deref_mut() {
            for (k, piece) in buf[..n].chunks(PIECE as usize).enumerate() {
                p.push(Piece {
                    offset: at + k as u64 * PIECE,
                    len: piece.len() as u64,
                    blake3: blake3::hash(piece).to_hex().to_string(),
                    sha256: hex::encode(sha2::Sha256::digest(piece)),
                });
            }
        }
        at += n as u64;
    }
    Ok(own.finalize().to_hex().to_string())
}

/// An image to burn: its manifest, and the file its bytes are read from as they are written (never
/// held whole: an image may be larger than memory, and drives burning at once read the same pages
/// of the page cache). A file changed after it was checked cannot reach a drive unnoticed: every
/// range written is read back and compared with the manifest's hash.
#[derive(Debug)]
pub struct Image {
    pub manifest: ImageManifest,
    file: std::fs::File,
}

impl Image {
    /// Reads a bare image file (no manifest to check it against) once: maps it and hashes it;
    /// refuses it unless it is an ext4 file system whose blocks fit in it.
    pub fn load(path: &Path, id: &str) -> std::io::Result<Image> {
        let img = Image::map(path, id)?;
        img.check_ext4().map_err(|e| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{}: {e}", path.display()),
            )
        })?;
        Ok(img)
    }

    /// Maps any file (whatever it holds) and hashes it: what [`Image::load`] and the builder's
    /// manifest start from.
    pub fn map(path: &Path, id: &str) -> std::io::Result<Image> {
        if !valid_id(id) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!(
                    "image id {id:?} must be 1-27 letters, digits, '.', '-' or '_', not starting with '.'"
                ),
            ));
        }
        let file = std::fs::File::open(path)
            .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
        let size = file.metadata()?.len();
        let mut ranges = Vec::new();
        let mut pieces = Vec::new();
        let mut whole = blake3::Hasher::new();
        let mut done = 0u64;
        let mut buf = vec![0u8; READ];
        for (off, len) in data_extents(&file, size)? {
            hash_zeros(&mut whole, off - done);
            let len = len.min(size.div_ceil(BLOCK) * BLOCK - off);
            let blake3 = hash_range(
                &file,
                size,
                off,
                len,
                &mut whole,
                &mut buf,
                Some(&mut pieces),
            )?;
            ranges.push(Range {
                offset: off,
                len,
                blake3,
            });
            done = (off + len).min(size);
        }
        hash_zeros(&mut whole, size - done);
        Ok(Image {
            manifest: ImageManifest {
                format: MANIFEST_FORMAT.into(),
                id: id.to_string(),
                size,
                blake3: whole.finalize().to_hex().to_string(),
                block_size: BLOCK,
                ranges,
                pieces,
            },
            file,
        })
    }

    /// Loads an image from the store: `dir` holds `manifest.json` (the builder's, with the
    /// image's manifest under `image`), `image.ext4`, and `manifest.json.sig` where it was signed.
    /// With `trusted` keys, the signature must be valid and by one of them. Then the image file
    /// is read against the manifest: its size, every range's BLAKE3 and the whole image's.
    /// Nothing about the image is trusted before that.
    pub fn load_stored(
        dir: &Path,
        trusted: Option<&crate::sign::TrustedKeys>,
    ) -> Result<Image, ImageError> {
        let mpath = dir.join("manifest.json");
        let bytes = std::fs::read(&mpath).map_err(io_at(&mpath))?;
        if let Some(keys) = trusted {
            let spath = dir.join(crate::sign::SIGNATURE_FILE);
            let sig = match std::fs::read_to_string(&spath) {
                Ok(s) => s,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Err(refused(
                        &mpath,
                        "not signed, and this burner only takes signed images",
                    ));
                }
                Err(e) => return Err(io_at(&spath)(e)),
            };
            keys.verify(&bytes, &sig).map_err(|e| refused(&mpath, e))?;
        }
        let value: serde_json::Value = serde_json::from_slice(&bytes)
            .map_err(|e| refused(&mpath, format!("not JSON: {e}")))?;
        let manifest: ImageManifest = serde_json::from_value(value["image"].clone())
            .map_err(|e| refused(&mpath, format!("no image manifest: {e}")))?;
        Image::load_checked(&dir.join("image.ext4"), manifest)
    }

    /// Reads the image file against `manifest`; refuses it at the first difference.
    pub fn load_checked(path: &Path, manifest: ImageManifest) -> Result<Image, ImageError> {
        manifest.check().map_err(|e| refused(path, e))?;
        let file = std::fs::File::open(path).map_err(io_at(path))?;
        let size = file.metadata().map_err(io_at(path))?.len();
        if size != manifest.size {
            return Err(refused(
                path,
                format!(
                    "{} bytes, the manifest of {} says {}: truncated or replaced",
                    size, manifest.id, manifest.size
                ),
            ));
        }
        let mut whole = blake3::Hasher::new();
        let mut done = 0u64;
        let mut buf = vec![0u8; READ];
        for r in &manifest.ranges {
            hash_zeros(&mut whole, r.offset - done);
            let got = hash_range(&file, size, r.offset, r.len, &mut whole, &mut buf, None)
                .map_err(io_at(path))?;
            if got != r.blake3 {
                return Err(refused(
                    path,
                    format!(
                        "bytes {}..{} have BLAKE3 {got}, the manifest of {} says {}: the file is corrupt",
                        r.offset,
                        r.offset + r.len,
                        manifest.id,
                        r.blake3
                    ),
                ));
            }
            done = (r.offset + r.len).min(size);
        }
        hash_zeros(&mut whole, size - done.min(size));
        let got = whole.finalize().to_hex().to_string();
        if got != manifest.blake3 {
            return Err(refused(
                path,
                format!(
                    "the image's BLAKE3 is {got}, its manifest says {}: the manifest's ranges do not make this image",
                    manifest.blake3
                ),
            ));
        }
        let img = Image { manifest, file };
        img.check_ext4().map_err(|e| refused(path, e))?;
        Ok(img)
    }

    /// Checks the image's superblock (see [`check_ext4`]).
    fn check_ext4(&self) -> Result<(), String> {
        let mut head = [0u8; 2048];
        match self.manifest.ranges.first() {
            Some(r) if r.offset == 0 && r.len >= 2048 => {
                self.read_at(&mut head, 0)
                    .map_err(|e| format!("cannot read the superblock: {e}"))?;
                check_ext4(&head, self.manifest.size)
            }
            _ => check_ext4(&[], self.manifest.size),
        }
    }

    /// Reads the image's bytes at `offset` (past the end of the file: zeros, up to the last
    /// range's end).
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let readable = (buf.len() as u64).min(self.manifest.size.saturating_sub(offset)) as usize;
        self.file.read_exact_at(&mut buf[..readable], offset)?;
        buf[readable..].fill(0);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sparse_file_maps_only_its_data() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        let f = std::fs::File::create(&path).unwrap();
        f.set_len(64 << 20).unwrap();
        f.write_all_at(&[7u8; 10_000], 4096).unwrap();
        f.write_all_at(&[9u8; 100], (32 << 20) + 5).unwrap();
        drop(f);
        let img = Image::map(&path, "v1").unwrap();
        let m = &img.manifest;
        assert_eq!(m.size, 64 << 20);
        assert_eq!(m.ranges.len(), 2, "{:?}", m.ranges);
        assert!(m.mapped_bytes() < 1 << 20, "{} mapped", m.mapped_bytes());
        assert_eq!(m.ranges[0].offset % BLOCK, 0);
        let mut b = [0u8; 1];
        img.read_at(&mut b, 4096).unwrap();
        assert_eq!(b[0], 7);
        // The whole-image hash treats holes as zeros.
        assert_eq!(
            m.blake3,
            blake3::hash(&std::fs::read(&path).unwrap())
                .to_hex()
                .to_string()
        );
        assert!(Image::map(&path, "bad/id").is_err());
        assert!(Image::map(&path, "empty").is_err());
        // Ids name store directories too: nothing that climbs out or hides.
        for bad in ["..", ".", ".fetch-x", "a/b", ""] {
            assert!(!valid_id(bad), "{bad:?}");
        }
        assert!(valid_id("av-2026.11.1_rc"));
        // Not ext4: a bare file is refused.
        let e = Image::load(&path, "v1").unwrap_err().to_string();
        assert!(e.contains("not an ext4 file system"), "{e}");
    }
}
