//! Where passphrases come from: a file, the environment, or the terminal.

use std::io::IsTerminal;
use std::path::Path;

use anyhow::{bail, Context, Result};

fn from_file(path: &Path) -> Result<Vec<u8>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading the passphrase file {}", path.display()))?;
    Ok(text.lines().next().unwrap_or("").as_bytes().to_vec())
}

/// The passphrase of an existing repository.
pub fn existing(file: Option<&Path>) -> Result<Vec<u8>> {
    get(file, "VMVAULT_PASSWORD", "repository passphrase: ", false)
}

/// A new passphrase (asked twice on a terminal). `env` names the variable to look in.
pub fn new(file: Option<&Path>, env: &str) -> Result<Vec<u8>> {
    get(file, env, "new passphrase: ", true)
}

fn get(file: Option<&Path>, env: &str, prompt: &str, confirm: bool) -> Result<Vec<u8>> {
    if let Some(f) = file {
        return from_file(f);
    }
    if let Ok(p) = std::env::var(env) {
        return Ok(p.into_bytes());
    }
    if !std::io::stdin().is_terminal() {
        bail!("no passphrase: set {env}, pass --password-file, or run on a terminal to be asked");
    }
    let p = rpassword::prompt_password(prompt).context("reading the passphrase")?;
    if confirm && rpassword::prompt_password("again: ").context("reading the passphrase")? != p {
        bail!("the two passphrases differ");
    }
    if p.is_empty() {
        bail!("empty passphrase");
    }
    Ok(p.into_bytes())
}
