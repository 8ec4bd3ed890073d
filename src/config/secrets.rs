//! Lists of secrets given inline and as files (`api.tokens` +
//! `api.token_files`, `admin.tokens` + `admin.token_files`): every one is
//! accepted, so a token is rotated by adding the new one first.

use std::path::{Path, PathBuf};

use secrecy::{ExposeSecret as _, SecretString};

use super::ConfigError;

/// The inline secrets of `inline_key` then those read from the files of
/// `files_key`; an empty one (or an unreadable file) is an error naming
/// the entry.
pub(crate) fn resolve(
    inline_key: &str,
    inline: Vec<SecretString>,
    files_key: &str,
    files: &[PathBuf],
) -> Result<Vec<SecretString>, ConfigError> {
    let mut secrets = Vec::new();
    for (i, s) in inline.into_iter().enumerate() {
        if s.expose_secret().trim().is_empty() {
            return Err(ConfigError::new(
                format!("{inline_key}[{i}]"),
                "must not be empty",
            ));
        }
        secrets.push(s);
    }
    for (i, path) in files.iter().enumerate() {
        secrets.push(read_file(&format!("{files_key}[{i}]"), path)?);
    }
    Ok(secrets)
}

/// One secret from a file, trimmed (a trailing newline is not part of it).
pub(crate) fn read_file(key: &str, path: &Path) -> Result<SecretString, ConfigError> {
    let content = std::fs::read_to_string(path)
        .map_err(|e| ConfigError::new(key, format!("cannot read {}: {e}", path.display())))?;
    let trimmed = content.trim();
    if trimmed.is_empty() {
        return Err(ConfigError::new(
            key,
            format!("{} is empty", path.display()),
        ));
    }
    Ok(SecretString::from(trimmed.to_string()))
}
