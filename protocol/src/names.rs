//! Which file names a peer may make us write. A name from the wire is a single plain path component of
//! a small alphabet, so it can never point outside the directory it is joined to.

use crate::ProtocolError;

/// Longest accepted name; CRIU's image names are short (`pagemap-shmem-123456.img`).
pub const MAX_NAME: usize = 128;

/// Accepts `[A-Za-z0-9._-]{1,128}` not starting with a dot (no `.`, `..`, hidden files, separators, NUL).
pub fn check_image_name(name: &str) -> Result<(), ProtocolError> {
    let bad = |why| Err(ProtocolError::BadName { name: name.chars().take(MAX_NAME).collect(), why });
    if name.is_empty() {
        return bad("empty");
    }
    if name.len() > MAX_NAME {
        return bad("longer than 128 bytes");
    }
    if name.starts_with('.') {
        return bad("starts with a dot");
    }
    if !name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)) {
        return bad("only letters, digits, '.', '_' and '-' are allowed (no path separators)");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn criu_names_pass_and_paths_do_not() {
        for ok in ["inventory.img", "pagemap-shmem-1407.img", "pages-65537.img", "core-12.img", "tty-info.img"] {
            check_image_name(ok).unwrap();
        }
        for bad in ["", ".", "..", "../x", "/abs", "a/b", "a\0b", ".hidden", "é.img", &"x".repeat(129)] {
            assert!(check_image_name(bad).is_err(), "{bad:?}");
        }
    }
}
