//! The node's API token (`<run dir>/api-token`, mode 0600, root's): policy-api's REST API and
//! l7proxy's admin `/v1/*` both want it as `Authorization: Bearer <token>`. Whichever of the
//! two starts first creates it; both then read the same one.

use std::io::{self, Read as _, Write as _};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::Path;

/// The header's scheme, with its space.
pub const BEARER: &str = "Bearer ";

/// Shortest token accepted from the file (a shorter one is replaced): 32 random bytes are 64.
const MIN_LEN: usize = 32;

/// The token at `path`: trimmed, or an error when it is missing or too short to be one.
pub fn read(path: &Path) -> io::Result<String> {
    let token = std::fs::read_to_string(path)?.trim().to_string();
    if token.len() < MIN_LEN {
        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("{} holds no token", path.display())));
    }
    Ok(token)
}

/// Reads the token at `path`, creating it (32 random bytes, hex, mode 0600) if missing. Safe
/// against another process doing the same at once: a new token is written aside and linked
/// into place, which fails when one is there already (then that one is read).
pub fn load_or_create(path: &Path) -> io::Result<String> {
    for _ in 0..3 {
        if let Ok(token) = read(path) {
            return Ok(token);
        }
        let mut bytes = [0u8; 32];
        std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
        let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        // Named apart per process and attempt (the token's first bytes are random).
        let aside = path.with_extension(format!("new-{}-{}", std::process::id(), &token[..16]));
        let _ = std::fs::remove_file(&aside);
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&aside)?;
        f.write_all(token.as_bytes())?;
        f.sync_all()?;
        drop(f);
        let linked = std::fs::hard_link(&aside, path);
        let _ = std::fs::remove_file(&aside);
        match linked {
            Ok(()) => return Ok(token),
            // Another process's token is in place (read it on the next turn), or a file that
            // holds none: replaced.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                if read(path).is_err() {
                    let _ = std::fs::remove_file(path);
                }
            }
            Err(e) => return Err(e),
        }
    }
    read(path)
}

/// The token an `Authorization` field value carries, if it is a bearer one.
pub fn from_authorization(value: &[u8]) -> Option<&[u8]> {
    value.strip_prefix(BEARER.as_bytes())
}

/// Equal without an early exit (the time taken does not tell how much of a guess was right).
pub fn same(given: &[u8], token: &[u8]) -> bool {
    given.len() == token.len() && given.iter().zip(token).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    fn dir(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("l7mesh-token-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn created_once_0600_and_read_back() {
        let d = dir("once");
        let path = d.join("api-token");
        let a = load_or_create(&path).unwrap();
        assert_eq!(a.len(), 64);
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(load_or_create(&path).unwrap(), a, "an existing token is kept");
        assert_eq!(read(&path).unwrap(), a);
        // A file holding no token is replaced.
        std::fs::write(&path, "short\n").unwrap();
        assert!(read(&path).is_err());
        let b = load_or_create(&path).unwrap();
        assert_ne!(a, b);
        assert_eq!(read(&path).unwrap(), b);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn racing_creators_agree_on_one_token() {
        let d = dir("race");
        let path = d.join("api-token");
        let tokens: Vec<String> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8).map(|_| s.spawn(|| load_or_create(&path).unwrap())).collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(tokens.iter().all(|t| *t == tokens[0]), "{tokens:?}");
        assert_eq!(read(&path).unwrap(), tokens[0]);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn bearer_values() {
        assert_eq!(from_authorization(b"Bearer abc"), Some(&b"abc"[..]));
        assert_eq!(from_authorization(b"bearer abc"), None);
        assert_eq!(from_authorization(b"Basic abc"), None);
        assert!(same(b"abc", b"abc"));
        assert!(!same(b"abd", b"abc") && !same(b"ab", b"abc") && !same(b"", b"abc"));
    }
}
