//! Customer pseudonyms: how customer ids leave the site.
//!
//! Records name customers by HMAC-SHA256(site key, customer id) in
//! lowercase hex, so the central platform can join a customer's records
//! without learning the id, and another site (another key) cannot link
//! them. The key stays on the site.
//!
//! Which mode applies:
//! - `[uplink]` present with `pseudonymize = false`: raw ids.
//! - otherwise (`[uplink]` with `pseudonymize = true`, the default, or no
//!   `[uplink]` at all): keyed pseudonyms. Without an uplink the records
//!   only sit in the outbox, but they are pseudonymized all the same, so
//!   adding an uplink later never ships raw ids that were queued earlier.
//!
//! The key is the content of `uplink.pseudonym_key` when set, else
//! `<data_dir>/pseudonym.key`, created with 32 random bytes (mode 0600)
//! when missing. A key file must hold at least 16 bytes.

use std::fmt;
use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use edge_config::SiteConfig;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use tracing::{info, warn};

/// Default key file name inside the data directory.
pub const DEFAULT_KEY_FILE: &str = "pseudonym.key";

/// Shortest key accepted from a file.
const MIN_KEY_LEN: usize = 16;

/// Length of a generated key.
const NEW_KEY_LEN: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum PseudonymError {
    #[error("cannot read pseudonym key {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot create pseudonym key {path}: {source}")]
    Create {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("pseudonym key {path} holds {len} bytes; at least {MIN_KEY_LEN} are needed")]
    TooShort { path: PathBuf, len: usize },
}

/// Maps customer ids to the form they take in records.
#[derive(Clone)]
pub struct Pseudonymizer {
    mode: Mode,
}

#[derive(Clone)]
enum Mode {
    /// A MAC already keyed; cloned per id, which skips re-deriving the key
    /// pads.
    Keyed(Box<Hmac<Sha256>>),
    Raw,
}

impl fmt::Debug for Pseudonymizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the key.
        let mode = match self.mode {
            Mode::Keyed(_) => "keyed",
            Mode::Raw => "raw",
        };
        f.debug_struct("Pseudonymizer")
            .field("mode", &mode)
            .finish()
    }
}

impl Pseudonymizer {
    /// Pseudonyms keyed with `key`.
    pub fn keyed(key: &[u8]) -> Pseudonymizer {
        // HMAC accepts keys of any length, so this cannot fail.
        let mac = <Hmac<Sha256> as Mac>::new_from_slice(key)
            .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
        Pseudonymizer {
            mode: Mode::Keyed(Box::new(mac)),
        }
    }

    /// Customer ids leave the site unchanged.
    pub fn raw() -> Pseudonymizer {
        Pseudonymizer { mode: Mode::Raw }
    }

    /// The pseudonymizer the site config asks for (see the module docs),
    /// creating the default key file when needed.
    pub fn from_config(site: &SiteConfig) -> Result<Pseudonymizer, PseudonymError> {
        let configured = match &site.uplink {
            Some(up) if !up.pseudonymize => {
                info!("uplink.pseudonymize = false: customer ids leave the site unchanged");
                return Ok(Pseudonymizer::raw());
            }
            Some(up) => up.pseudonym_key.clone(),
            None => None,
        };
        let path = configured.unwrap_or_else(|| site.site.data_dir.join(DEFAULT_KEY_FILE));
        let key = load_or_create_key(&path)?;
        Ok(Pseudonymizer::keyed(&key))
    }

    /// The id as it appears in records: lowercase hex HMAC-SHA256, or the
    /// id itself in raw mode.
    pub fn pseudonym(&self, customer: &str) -> String {
        match &self.mode {
            Mode::Keyed(mac) => {
                let mut mac = mac.as_ref().clone();
                mac.update(customer.as_bytes());
                hex::encode(mac.finalize().into_bytes())
            }
            Mode::Raw => customer.to_owned(),
        }
    }
}

/// Reads the key file, creating it with a random key when it does not
/// exist. An existing file is never overwritten: changing the key would
/// give every customer a new pseudonym.
pub fn load_or_create_key(path: &Path) -> Result<Vec<u8>, PseudonymError> {
    match read_key(path) {
        Ok(key) => return Ok(key),
        Err(PseudonymError::Read { source, .. })
            if source.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let key: [u8; NEW_KEY_LEN] = rand::random();
    let created = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path);
    match created {
        Ok(mut file) => {
            let written = file.write_all(&key).and_then(|()| file.sync_all());
            if let Err(source) = written {
                // Leave no half-written key behind for the next start.
                let _ = std::fs::remove_file(path);
                return Err(PseudonymError::Create {
                    path: path.to_owned(),
                    source,
                });
            }
            info!(path = %path.display(), "created a new pseudonym key");
            Ok(key.to_vec())
        }
        // Another process created it in between: use theirs.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => read_key(path),
        Err(source) => Err(PseudonymError::Create {
            path: path.to_owned(),
            source,
        }),
    }
}

fn read_key(path: &Path) -> Result<Vec<u8>, PseudonymError> {
    let read_err = |source| PseudonymError::Read {
        path: path.to_owned(),
        source,
    };
    let mut file = std::fs::File::open(path).map_err(read_err)?;
    let mut key = Vec::new();
    file.read_to_end(&mut key).map_err(read_err)?;
    if key.len() < MIN_KEY_LEN {
        return Err(PseudonymError::TooShort {
            path: path.to_owned(),
            len: key.len(),
        });
    }
    if let Ok(meta) = file.metadata() {
        if meta.permissions().mode() & 0o077 != 0 {
            warn!(path = %path.display(), "pseudonym key is readable by group or others; chmod 600 it");
        }
    }
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keyed_is_stable_hex_and_key_dependent() {
        let a = Pseudonymizer::keyed(b"0123456789abcdef");
        let b = Pseudonymizer::keyed(b"fedcba9876543210");
        let p = a.pseudonym("fan-1");
        assert_eq!(p.len(), 64);
        assert!(p
            .chars()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
        assert_eq!(p, a.pseudonym("fan-1"));
        assert_ne!(p, a.pseudonym("fan-2"));
        assert_ne!(p, b.pseudonym("fan-1"));
        assert_eq!(Pseudonymizer::raw().pseudonym("fan-1"), "fan-1");
    }

    #[test]
    fn known_vector() {
        // RFC 4231 test case 2.
        let p = Pseudonymizer::keyed(b"Jefe");
        assert_eq!(
            p.pseudonym("what do ya want for nothing?"),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn key_file_created_once_with_0600_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(DEFAULT_KEY_FILE);
        let k1 = load_or_create_key(&path).unwrap();
        assert_eq!(k1.len(), NEW_KEY_LEN);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let k2 = load_or_create_key(&path).unwrap();
        assert_eq!(k1, k2);

        std::fs::write(&path, b"short").unwrap();
        assert!(matches!(
            load_or_create_key(&path),
            Err(PseudonymError::TooShort { len: 5, .. })
        ));
    }
}
