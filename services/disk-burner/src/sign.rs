//! Signed image manifests: the builder signs each `manifest.json` with an ed25519 key, burners
//! accept only manifests signed by keys they trust. The manifest holds the image's BLAKE3 and
//! every range's, so a valid signature vouches for every byte burned.
//!
//! Files (text, one line each, so they can be read, diffed and passed around):
//! - secret key: `motorpool-ed25519-secret <64 hex: the seed>` (mode 0600);
//! - public key: `motorpool-ed25519 <64 hex> [comment]`; a burner's trusted keys file holds any
//!   number of these lines (`#` comments allowed);
//! - signature, `manifest.json.sig` beside the manifest:
//!   `motorpool-ed25519 <public key hex> <128 hex: the signature over the manifest file's bytes>`.
//!
//! The signature covers the file's exact bytes: nothing is re-serialised before checking.

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use std::path::Path;

pub const SIGNATURE_FILE: &str = "manifest.json.sig";
const PUBLIC: &str = "motorpool-ed25519";
const SECRET: &str = "motorpool-ed25519-secret";

/// A key that signs manifests.
pub struct ManifestSigner(SigningKey);

impl ManifestSigner {
    /// A new random key.
    pub fn generate() -> ManifestSigner {
        ManifestSigner(SigningKey::from_bytes(&rand::random::<[u8; 32]>()))
    }

    /// Reads a secret key file.
    pub fn read(path: &Path) -> Result<ManifestSigner, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let hex = text
            .trim()
            .strip_prefix(SECRET)
            .map(str::trim)
            .ok_or_else(|| format!("{}: not a {SECRET} key file", path.display()))?;
        let seed: [u8; 32] = hex::decode(hex)
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| format!("{}: the key is not 64 hex digits", path.display()))?;
        Ok(ManifestSigner(SigningKey::from_bytes(&seed)))
    }

    /// Writes the secret key (mode 0600, never over an existing file) and its public key beside
    /// it (`<path>.pub`).
    pub fn write(&self, path: &Path, comment: &str) -> std::io::Result<()> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)?;
        writeln!(f, "{SECRET} {}", hex::encode(self.0.to_bytes()))?;
        let mut public = path.as_os_str().to_owned();
        public.push(".pub");
        let line = match comment {
            "" => self.public_line(),
            c => format!("{} {c}", self.public_line()),
        };
        std::fs::write(public, line + "\n")
    }

    /// `motorpool-ed25519 <hex>`: the line a burner's trusted keys file holds.
    pub fn public_line(&self) -> String {
        format!(
            "{PUBLIC} {}",
            hex::encode(self.0.verifying_key().to_bytes())
        )
    }

    /// The signature file's content for `manifest` (the file's bytes).
    pub fn sign(&self, manifest: &[u8]) -> String {
        format!(
            "{PUBLIC} {} {}\n",
            hex::encode(self.0.verifying_key().to_bytes()),
            hex::encode(self.0.sign(manifest).to_bytes())
        )
    }
}

/// The keys a burner accepts signatures from.
#[derive(Clone, Debug, Default)]
pub struct TrustedKeys(Vec<VerifyingKey>);

impl TrustedKeys {
    /// Parses a trusted keys file's text: `motorpool-ed25519 <hex> [comment]` lines.
    pub fn parse(text: &str) -> Result<TrustedKeys, String> {
        let mut keys = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut words = line.split_whitespace();
            let key = (words.next() == Some(PUBLIC))
                .then(|| words.next())
                .flatten()
                .and_then(|h| hex::decode(h).ok())
                .and_then(|b| <[u8; 32]>::try_from(b).ok())
                .and_then(|b| VerifyingKey::from_bytes(&b).ok())
                .ok_or_else(|| format!("line {}: not a `{PUBLIC} <64 hex>` public key", n + 1))?;
            keys.push(key);
        }
        if keys.is_empty() {
            return Err("no public key in it".into());
        }
        Ok(TrustedKeys(keys))
    }

    pub fn read(path: &Path) -> Result<TrustedKeys, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        TrustedKeys::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Checks a signature file's content against `manifest`: well formed, by a trusted key,
    /// valid over these exact bytes.
    pub fn verify(&self, manifest: &[u8], signature: &str) -> Result<(), String> {
        let words: Vec<&str> = signature.split_whitespace().collect();
        let [PUBLIC, key, sig] = words[..] else {
            return Err(format!(
                "the signature file is not `{PUBLIC} <key> <signature>`"
            ));
        };
        let key = hex::decode(key)
            .ok()
            .and_then(|b| <[u8; 32]>::try_from(b).ok())
            .and_then(|b| VerifyingKey::from_bytes(&b).ok())
            .ok_or("the signature names no valid public key")?;
        if !self.0.contains(&key) {
            return Err(format!(
                "signed by {PUBLIC} {}, which this burner does not trust",
                hex::encode(key.to_bytes())
            ));
        }
        let sig = hex::decode(sig)
            .ok()
            .and_then(|b| <[u8; 64]>::try_from(b).ok())
            .map(|b| Signature::from_bytes(&b))
            .ok_or("the signature is not 128 hex digits")?;
        key.verify(manifest, &sig).map_err(|_| {
            "the signature does not match the manifest: it was changed after signing".to_string()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_holds_only_for_the_signed_bytes_and_trusted_keys() {
        let dir = tempfile::tempdir().unwrap();
        let key_path = dir.path().join("fleet.key");
        let signer = ManifestSigner::generate();
        signer.write(&key_path, "builder-1").unwrap();
        // Never overwrites a key.
        assert!(signer.write(&key_path, "again").is_err());
        let signer = ManifestSigner::read(&key_path).unwrap();
        let public = std::fs::read_to_string(dir.path().join("fleet.key.pub")).unwrap();
        assert!(public.starts_with(&signer.public_line()), "{public}");
        let trusted = TrustedKeys::parse(&format!("# the fleet's builders\n{public}")).unwrap();

        let manifest = br#"{"image":{"blake3":"ab"}}"#;
        let sig = signer.sign(manifest);
        trusted.verify(manifest, &sig).unwrap();
        // One byte changed in the manifest.
        let tampered = br#"{"image":{"blake3":"ac"}}"#;
        let e = trusted.verify(tampered, &sig).unwrap_err();
        assert!(e.contains("changed after signing"), "{e}");
        // Another key's signature, valid as such, is not trusted.
        let stranger = ManifestSigner::generate().sign(manifest);
        assert!(
            trusted
                .verify(manifest, &stranger)
                .unwrap_err()
                .contains("does not trust")
        );
        // A signature swapped in under the trusted key's name fails too.
        let forged = format!(
            "{} {}",
            signer.public_line(),
            stranger.split_whitespace().nth(2).unwrap()
        );
        assert!(trusted.verify(manifest, &forged).is_err());
        for bad in [
            "",
            "motorpool-ed25519",
            "motorpool-ed25519 zz yy",
            "ssh-ed25519 AAAA",
        ] {
            assert!(trusted.verify(manifest, bad).is_err(), "{bad:?}");
        }
        assert!(TrustedKeys::parse("# nothing\n").is_err());
        assert!(TrustedKeys::parse("motorpool-ed25519 1234").is_err());
    }
}
