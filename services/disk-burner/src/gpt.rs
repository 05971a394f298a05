//! GUID Partition Tables, read and written here (UEFI 2.10, section 5.3), so that the burner
//! needs no partitioning tool and every byte it writes is its own decision.
//!
//! Layout on a disk of N 512-byte sectors: LBA 0 a protective MBR; LBA 1 the primary header;
//! LBA 2..34 the 128 partition entries of 128 bytes; the backup entries at N-33..N-2 and the
//! backup header at N-1. Both headers carry a CRC32 of themselves and of the entries.

use std::fmt;
use std::io::{Read, Seek, SeekFrom, Write};

pub const SECTOR: u64 = 512;
const ENTRIES: usize = 128;
const ENTRY_SIZE: usize = 128;
const ENTRY_SECTORS: u64 = (ENTRIES * ENTRY_SIZE) as u64 / SECTOR;
/// First sector a partition may use (after the primary header and entries).
pub const FIRST_USABLE: u64 = 2 + ENTRY_SECTORS;

/// A GUID in its textual byte order (`00112233-4455-...` is `[0x00, 0x11, ...]`).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Guid(pub [u8; 16]);

impl Guid {
    pub const ZERO: Guid = Guid([0; 16]);
    /// EFI System Partition.
    pub const ESP: Guid = Guid([
        0xc1, 0x2a, 0x73, 0x28, 0xf8, 0x1f, 0x11, 0xd2, 0xba, 0x4b, 0x00, 0xa0, 0xc9, 0x3e, 0xc9,
        0x3b,
    ]);
    /// Linux filesystem data.
    pub const LINUX: Guid = Guid([
        0x0f, 0xc6, 0x3d, 0xaf, 0x84, 0x83, 0x47, 0x72, 0x8e, 0x79, 0x3d, 0x69, 0xd8, 0x47, 0x7d,
        0xe4,
    ]);

    pub fn random() -> Guid {
        let mut b: [u8; 16] = rand::random();
        b[6] = (b[6] & 0x0f) | 0x40; // version 4
        b[8] = (b[8] & 0x3f) | 0x80; // RFC 4122 variant
        Guid(b)
    }

    /// The on-disk form: the first three fields little-endian.
    pub fn to_disk(self) -> [u8; 16] {
        let b = self.0;
        [
            b[3], b[2], b[1], b[0], b[5], b[4], b[7], b[6], b[8], b[9], b[10], b[11], b[12], b[13],
            b[14], b[15],
        ]
    }

    pub fn from_disk(d: &[u8]) -> Guid {
        Guid([
            d[3], d[2], d[1], d[0], d[5], d[4], d[7], d[6], d[8], d[9], d[10], d[11], d[12], d[13],
            d[14], d[15],
        ])
    }

    pub fn parse(s: &str) -> Option<Guid> {
        let hex: String = s.chars().filter(|c| *c != '-').collect();
        if hex.len() != 32 || s.len() != 36 {
            return None;
        }
        let bytes = hex::decode(hex).ok()?;
        Some(Guid(bytes.try_into().ok()?))
    }
}

impl fmt::Display for Guid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let h = hex::encode(self.0);
        write!(
            f,
            "{}-{}-{}-{}-{}",
            &h[0..8],
            &h[8..12],
            &h[12..16],
            &h[16..20],
            &h[20..32]
        )
    }
}

impl fmt::Debug for Guid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// One partition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Partition {
    pub type_guid: Guid,
    pub unique_guid: Guid,
    pub first_lba: u64,
    /// Inclusive.
    pub last_lba: u64,
    pub attributes: u64,
    /// At most 36 UTF-16 code units.
    pub name: String,
}

impl Partition {
    pub fn offset(&self) -> u64 {
        self.first_lba * SECTOR
    }
    pub fn len(&self) -> u64 {
        (self.last_lba + 1 - self.first_lba) * SECTOR
    }
    pub fn is_empty(&self) -> bool {
        self.last_lba < self.first_lba
    }
}

/// A partition table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Gpt {
    pub disk_guid: Guid,
    /// Sectors on the disk.
    pub sectors: u64,
    /// In entry order; entry i is partition number i + 1.
    pub partitions: Vec<Partition>,
}

/// Why a disk's table could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum GptError {
    #[error("no GPT: {0}")]
    Missing(String),
    #[error("corrupt GPT: {0}")]
    Corrupt(String),
    #[error("invalid layout: {0}")]
    Invalid(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap_or([0; 8]))
}
fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap_or([0; 4]))
}

impl Gpt {
    /// The last sector a partition may use.
    pub fn last_usable(&self) -> u64 {
        self.sectors - 2 - ENTRY_SECTORS
    }

    fn check(&self) -> Result<(), GptError> {
        if self.sectors < 2 * FIRST_USABLE + 8 {
            return Err(GptError::Invalid(format!(
                "{} sectors is too small for a GPT",
                self.sectors
            )));
        }
        if self.partitions.len() > ENTRIES {
            return Err(GptError::Invalid(format!(
                "{} partitions; at most {ENTRIES}",
                self.partitions.len()
            )));
        }
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        for (i, p) in self.partitions.iter().enumerate() {
            if p.type_guid == Guid::ZERO {
                continue;
            }
            if p.first_lba < FIRST_USABLE
                || p.last_lba > self.last_usable()
                || p.last_lba < p.first_lba
            {
                return Err(GptError::Invalid(format!(
                    "partition {} spans sectors {}..={} outside {FIRST_USABLE}..={}",
                    i + 1,
                    p.first_lba,
                    p.last_lba,
                    self.last_usable()
                )));
            }
            if ranges
                .iter()
                .any(|(a, b)| p.first_lba <= *b && *a <= p.last_lba)
            {
                return Err(GptError::Invalid(format!(
                    "partition {} overlaps another",
                    i + 1
                )));
            }
            if p.name.encode_utf16().count() > 36 {
                return Err(GptError::Invalid(format!(
                    "partition {} name {:?} is over 36 characters",
                    i + 1,
                    p.name
                )));
            }
            ranges.push((p.first_lba, p.last_lba));
        }
        Ok(())
    }

    fn entries(&self) -> Vec<u8> {
        let mut e = vec![0u8; ENTRIES * ENTRY_SIZE];
        for (i, p) in self.partitions.iter().enumerate() {
            let b = &mut e[i * ENTRY_SIZE..(i + 1) * ENTRY_SIZE];
            b[0..16].copy_from_slice(&p.type_guid.to_disk());
            b[16..32].copy_from_slice(&p.unique_guid.to_disk());
            b[32..40].copy_from_slice(&p.first_lba.to_le_bytes());
            b[40..48].copy_from_slice(&p.last_lba.to_le_bytes());
            b[48..56].copy_from_slice(&p.attributes.to_le_bytes());
            for (k, unit) in p.name.encode_utf16().take(36).enumerate() {
                b[56 + 2 * k..58 + 2 * k].copy_from_slice(&unit.to_le_bytes());
            }
        }
        e
    }

    fn header(
        &self,
        current: u64,
        backup: u64,
        entries_lba: u64,
        entries_crc: u32,
    ) -> [u8; SECTOR as usize] {
        let mut h = [0u8; SECTOR as usize];
        h[0..8].copy_from_slice(b"EFI PART");
        h[8..12].copy_from_slice(&0x0001_0000u32.to_le_bytes());
        h[12..16].copy_from_slice(&92u32.to_le_bytes());
        h[24..32].copy_from_slice(&current.to_le_bytes());
        h[32..40].copy_from_slice(&backup.to_le_bytes());
        h[40..48].copy_from_slice(&FIRST_USABLE.to_le_bytes());
        h[48..56].copy_from_slice(&self.last_usable().to_le_bytes());
        h[56..72].copy_from_slice(&self.disk_guid.to_disk());
        h[72..80].copy_from_slice(&entries_lba.to_le_bytes());
        h[80..84].copy_from_slice(&(ENTRIES as u32).to_le_bytes());
        h[84..88].copy_from_slice(&(ENTRY_SIZE as u32).to_le_bytes());
        h[88..92].copy_from_slice(&entries_crc.to_le_bytes());
        let crc = crc32fast::hash(&h[..92]);
        h[16..20].copy_from_slice(&crc.to_le_bytes());
        h
    }

    /// Writes the protective MBR, both headers and both entry arrays.
    pub fn write<D: Write + Seek>(&self, disk: &mut D) -> Result<(), GptError> {
        self.check()?;
        let last = self.sectors - 1;
        let mut mbr = [0u8; SECTOR as usize];
        let e = &mut mbr[446..462];
        e[1..4].copy_from_slice(&[0x00, 0x02, 0x00]);
        e[4] = 0xee;
        e[5..8].copy_from_slice(&[0xff, 0xff, 0xff]);
        e[8..12].copy_from_slice(&1u32.to_le_bytes());
        e[12..16].copy_from_slice(&(last.min(u32::MAX as u64) as u32).to_le_bytes());
        mbr[510] = 0x55;
        mbr[511] = 0xaa;
        let entries = self.entries();
        let crc = crc32fast::hash(&entries);
        let backup_entries = last - ENTRY_SECTORS;
        disk.seek(SeekFrom::Start(0))?;
        disk.write_all(&mbr)?;
        disk.write_all(&self.header(1, last, 2, crc))?;
        disk.write_all(&entries)?;
        disk.seek(SeekFrom::Start(backup_entries * SECTOR))?;
        disk.write_all(&entries)?;
        disk.write_all(&self.header(last, 1, backup_entries, crc))?;
        disk.flush()?;
        Ok(())
    }

    /// Reads and checks the primary table (the backup when the primary is damaged).
    pub fn read<D: Read + Seek>(disk: &mut D, sectors: u64) -> Result<Gpt, GptError> {
        if sectors < 2 * FIRST_USABLE + 8 {
            return Err(GptError::Missing(format!(
                "{sectors} sectors is too small for a GPT"
            )));
        }
        match Self::read_at(disk, sectors, 1) {
            Ok(g) => Ok(g),
            Err(primary) => Self::read_at(disk, sectors, sectors - 1).map_err(|_| primary),
        }
    }

    fn read_at<D: Read + Seek>(disk: &mut D, sectors: u64, lba: u64) -> Result<Gpt, GptError> {
        let mut h = [0u8; SECTOR as usize];
        disk.seek(SeekFrom::Start(lba * SECTOR))?;
        disk.read_exact(&mut h)?;
        if &h[0..8] != b"EFI PART" {
            return Err(GptError::Missing(format!(
                "no GPT signature at sector {lba}"
            )));
        }
        let size = le32(&h, 12) as usize;
        if !(92..=SECTOR as usize).contains(&size) {
            return Err(GptError::Corrupt(format!("header size {size}")));
        }
        let stored = le32(&h, 16);
        let mut copy = h;
        copy[16..20].fill(0);
        if crc32fast::hash(&copy[..size]) != stored {
            return Err(GptError::Corrupt(format!(
                "header CRC mismatch at sector {lba}"
            )));
        }
        let (entries_lba, count, esize) =
            (le64(&h, 72), le32(&h, 80) as usize, le32(&h, 84) as usize);
        if esize != ENTRY_SIZE || count == 0 || count > 1024 {
            return Err(GptError::Corrupt(format!(
                "{count} entries of {esize} bytes"
            )));
        }
        let mut entries = vec![0u8; count * esize];
        disk.seek(SeekFrom::Start(entries_lba * SECTOR))?;
        disk.read_exact(&mut entries)?;
        if crc32fast::hash(&entries) != le32(&h, 88) {
            return Err(GptError::Corrupt("partition entries CRC mismatch".into()));
        }
        let mut partitions = Vec::new();
        for b in entries.chunks_exact(esize) {
            let type_guid = Guid::from_disk(&b[0..16]);
            let units: Vec<u16> = b[56..128]
                .chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]))
                .take_while(|u| *u != 0)
                .collect();
            partitions.push(Partition {
                type_guid,
                unique_guid: Guid::from_disk(&b[16..32]),
                first_lba: le64(b, 32),
                last_lba: le64(b, 40),
                attributes: le64(b, 48),
                name: String::from_utf16_lossy(&units),
            });
        }
        while partitions.last().is_some_and(|p| p.type_guid == Guid::ZERO) {
            partitions.pop();
        }
        Ok(Gpt {
            disk_guid: Guid::from_disk(&h[56..72]),
            sectors,
            partitions,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    fn table(sectors: u64) -> Gpt {
        Gpt {
            disk_guid: Guid::parse("00000000-1234-4567-89ab-cdef01234567").unwrap(),
            sectors,
            partitions: vec![
                Partition {
                    type_guid: Guid::ESP,
                    unique_guid: Guid::random(),
                    first_lba: 2048,
                    last_lba: 4095,
                    attributes: 0,
                    name: "EFI system".into(),
                },
                Partition {
                    type_guid: Guid::LINUX,
                    unique_guid: Guid::random(),
                    first_lba: 4096,
                    last_lba: 8191,
                    attributes: 0,
                    name: "mp-image 2026.11.22-ünïcode".into(),
                },
            ],
        }
    }

    #[test]
    fn guids_print_parse_and_swap_their_first_fields_on_disk() {
        let g = Guid::ESP;
        assert_eq!(g.to_string(), "c12a7328-f81f-11d2-ba4b-00a0c93ec93b");
        assert_eq!(Guid::parse(&g.to_string()), Some(g));
        assert_eq!(&g.to_disk()[..4], &[0x28, 0x73, 0x2a, 0xc1]);
        assert_eq!(Guid::from_disk(&g.to_disk()), g);
        assert_eq!(Guid::parse("not-a-guid"), None);
    }

    #[test]
    fn a_table_round_trips_and_survives_a_damaged_primary() {
        let sectors = 16384;
        let mut disk = Cursor::new(vec![0u8; (sectors * SECTOR) as usize]);
        let t = table(sectors);
        t.write(&mut disk).unwrap();
        let back = Gpt::read(&mut disk, sectors).unwrap();
        assert_eq!(back, t);
        let raw = disk.get_ref();
        assert_eq!(&raw[510..512], &[0x55, 0xaa]);
        assert_eq!(raw[450], 0xee, "protective MBR");
        // Damage the primary header: the backup still reads.
        disk.get_mut()[(SECTOR + 30) as usize] ^= 0xff;
        assert_eq!(Gpt::read(&mut disk, sectors).unwrap(), t);
        // Damage both: a clear error.
        let last = ((sectors - 1) * SECTOR + 30) as usize;
        disk.get_mut()[last] ^= 0xff;
        let e = Gpt::read(&mut disk, sectors).unwrap_err();
        assert!(e.to_string().contains("CRC"), "{e}");
        // A blank disk has no GPT.
        let mut blank = Cursor::new(vec![0u8; (sectors * SECTOR) as usize]);
        assert!(matches!(
            Gpt::read(&mut blank, sectors),
            Err(GptError::Missing(_))
        ));
    }

    #[test]
    fn overlapping_or_out_of_range_partitions_are_refused() {
        let mut t = table(16384);
        t.partitions[1].first_lba = 4000;
        assert!(
            t.write(&mut Cursor::new(vec![0u8; 16384 * 512]))
                .unwrap_err()
                .to_string()
                .contains("overlaps")
        );
        let mut t = table(16384);
        t.partitions[1].last_lba = 16384;
        assert!(matches!(
            t.write(&mut Cursor::new(vec![0u8; 16384 * 512])),
            Err(GptError::Invalid(_))
        ));
    }
}
