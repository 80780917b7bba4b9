//! A machine's cluster identity: an Ed25519 key pair kept in the data dir.
//!
//! The libp2p peer id derived from the public key is what a coordinator lists in its
//! `[cluster]` section and what a node accepts as its coordinator. The noise handshake
//! proves possession of the key on every connection, so an address alone never
//! authenticates a peer.
//!
//! # File format (`identity.key`, version 1)
//!
//! `b"MBTDKEY1"` · `u32` LE length `n` · `n` bytes of the libp2p protobuf encoding of
//! the key pair · `u32` LE CRC-32 of everything before it. Written owner-only (0600)
//! through a temp file, fsync, rename and an fsync of the directory.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use libp2p::PeerId;
use libp2p::identity::Keypair;

const MAGIC: &[u8; 8] = b"MBTDKEY1";

/// Why an identity file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("cannot {action} identity file {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "identity file {path} is damaged ({what}); restore it from a backup, or delete it to \
         create a new identity (the coordinator's `[cluster]` list must then name the new peer id)"
    )]
    Damaged { path: PathBuf, what: &'static str },
    #[error(
        "identity file {path} is readable or writable by other users (mode {mode:o}); \
         run `chmod 600 {path}`"
    )]
    Exposed { path: PathBuf, mode: u32 },
}

/// Encodes a key pair in the version-1 file format.
pub fn encode(keypair: &Keypair) -> Vec<u8> {
    let key = keypair
        .to_protobuf_encoding()
        .expect("an Ed25519 key pair always has a protobuf encoding");
    let mut out = Vec::with_capacity(key.len() + 16);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(key.len() as u32).to_le_bytes());
    out.extend_from_slice(&key);
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

/// Decodes the version-1 file format; `path` only names the file in errors.
pub fn decode(bytes: &[u8], path: &Path) -> Result<Keypair, IdentityError> {
    let damaged = |what| IdentityError::Damaged {
        path: path.to_path_buf(),
        what,
    };
    if bytes.len() < 16 || &bytes[..8] != MAGIC {
        return Err(damaged("not an mbtd identity file, or an unknown version"));
    }
    let n = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes")) as usize;
    if bytes.len() != 16 + n {
        return Err(damaged("wrong length"));
    }
    let crc = u32::from_le_bytes(bytes[12 + n..].try_into().expect("4 bytes"));
    if crc32fast::hash(&bytes[..12 + n]) != crc {
        return Err(damaged("checksum mismatch"));
    }
    Keypair::from_protobuf_encoding(&bytes[12..12 + n]).map_err(|_| damaged("not a key pair"))
}

/// Loads the identity at `path`, creating a new random one if the file does not exist.
pub fn load_or_create(path: &Path) -> Result<Keypair, IdentityError> {
    let io = |action| {
        move |source| IdentityError::Io {
            action,
            path: path.to_path_buf(),
            source,
        }
    };
    match fs::read(path) {
        Ok(bytes) => {
            let mode = fs::metadata(path)
                .map_err(io("inspect"))?
                .permissions()
                .mode();
            if mode & 0o077 != 0 {
                return Err(IdentityError::Exposed {
                    path: path.to_path_buf(),
                    mode: mode & 0o777,
                });
            }
            decode(&bytes, path)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let keypair = Keypair::generate_ed25519();
            write_durably(path, &encode(&keypair)).map_err(io("write"))?;
            Ok(keypair)
        }
        Err(e) => Err(io("read")(e)),
    }
}

/// The peer id of a key pair, as written in configs and logs.
pub fn peer_id(keypair: &Keypair) -> PeerId {
    keypair.public().to_peer_id()
}

fn write_durably(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir)?;
    let tmp = path.with_extension("key.tmp");
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    fs::rename(&tmp, path)?;
    fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_created_identity_loads_back_as_the_same_peer() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("identity.key");
        let first = load_or_create(&path).unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let again = load_or_create(&path).unwrap();
        assert_eq!(peer_id(&first), peer_id(&again));
    }

    #[test]
    fn every_flipped_byte_is_refused() {
        let path = Path::new("identity.key");
        let bytes = encode(&Keypair::generate_ed25519());
        assert!(decode(&bytes, path).is_ok());
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x20;
            assert!(decode(&bad, path).is_err(), "byte {i} flipped was accepted");
        }
        assert!(decode(&bytes[..bytes.len() - 1], path).is_err());
    }

    #[test]
    fn a_file_other_users_can_read_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("identity.key");
        load_or_create(&path).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let err = load_or_create(&path).unwrap_err().to_string();
        assert!(err.contains("chmod 600"), "{err}");
    }
}
