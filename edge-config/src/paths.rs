//! Paths and file reading shared by the site config and the rule files.
//!
//! The model holds absolute paths so the daemon's behaviour does not depend
//! on its working directory, while messages show paths the way the
//! operator typed them whenever possible.

use std::io::Read;
use std::path::{Component, Path, PathBuf};

use crate::diagnostic::ConfigErrors;
use crate::units::format_size;

/// Largest config or rule file read: far beyond any real one, and a bound
/// when a path names a device or a runaway file by mistake.
const MAX_FILE_LEN: u64 = 16 * 1024 * 1024;

/// A file's text, or a diagnostic saying why it could not be read.
pub(crate) fn read_text(path: &Path) -> Result<String, ConfigErrors> {
    let cannot_read = |e: std::io::Error| ConfigErrors::file(path, format!("cannot read: {e}"));
    let file = std::fs::File::open(path).map_err(cannot_read)?;
    let mut bytes = Vec::new();
    file.take(MAX_FILE_LEN + 1)
        .read_to_end(&mut bytes)
        .map_err(cannot_read)?;
    if bytes.len() as u64 > MAX_FILE_LEN {
        return Err(ConfigErrors::file(
            path,
            format!(
                "larger than {}; is this the right file?",
                format_size(MAX_FILE_LEN)
            ),
        ));
    }
    String::from_utf8(bytes).map_err(|e| {
        ConfigErrors::file(
            path,
            format!(
                "not UTF-8 (invalid byte at offset {}); TOML files must be UTF-8",
                e.utf8_error().valid_up_to()
            ),
        )
    })
}

/// `path` made absolute against the working directory, with `.`
/// components removed. `..` stays: removing it lexically would be wrong
/// across symlinks.
pub(crate) fn absolute(path: &Path) -> PathBuf {
    let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    clean(&abs)
}

/// `relative` resolved against `base` (the config file's folder); absolute
/// paths stay as they are.
pub(crate) fn resolve(base: &Path, relative: &Path) -> PathBuf {
    clean(&base.join(relative))
}

/// The folder relative paths in `file` resolve against.
pub(crate) fn base_of(file: &Path) -> PathBuf {
    absolute(file)
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// How a file is named in diagnostics: relative to the working directory
/// when it lies below it, else as given.
pub(crate) fn shown(path: &Path) -> PathBuf {
    if path.is_absolute() {
        if let Ok(cwd) = std::env::current_dir() {
            if let Ok(rel) = path.strip_prefix(&cwd) {
                if !rel.as_os_str().is_empty() {
                    return rel.to_path_buf();
                }
            }
        }
    }
    path.to_path_buf()
}

fn clean(path: &Path) -> PathBuf {
    path.components()
        .filter(|c| !matches!(c, Component::CurDir))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_against_the_base() {
        let base = Path::new("/etc/touchline");
        assert_eq!(
            resolve(base, Path::new("./data")),
            Path::new("/etc/touchline/data")
        );
        assert_eq!(
            resolve(base, Path::new("../certs/ca.pem")),
            Path::new("/etc/touchline/../certs/ca.pem")
        );
        assert_eq!(
            resolve(base, Path::new("/var/lib/tl")),
            Path::new("/var/lib/tl")
        );
    }

    #[test]
    fn base_of_a_bare_file_name_is_the_working_directory() {
        let cwd = std::env::current_dir().expect("working directory");
        assert_eq!(base_of(Path::new("site.toml")), cwd);
        assert_eq!(
            base_of(Path::new("/etc/touchline/site.toml")),
            Path::new("/etc/touchline")
        );
    }
}
