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
    get(file, "VMVAULT_PASSWORD", "--password-file", "repository passphrase: ", false)
}

/// A pool's password (`xapi` commands): `--pool-password-file`, VMVAULT_XAPI_PASSWORD, or a prompt.
pub fn pool(file: Option<&Path>) -> Result<String> {
    let p = get(file, "VMVAULT_XAPI_PASSWORD", "--pool-password-file", "pool password: ", false)?;
    String::from_utf8(p).context("the pool password is not UTF-8")
}

/// A new passphrase (asked twice on a terminal). `env` names the variable to look in.
pub fn new(file: Option<&Path>, env: &str) -> Result<Vec<u8>> {
    get(file, env, "--password-file", "new passphrase: ", true)
}

fn get(file: Option<&Path>, env: &str, flag: &str, prompt: &str, confirm: bool) -> Result<Vec<u8>> {
    if let Some(f) = file {
        return from_file(f);
    }
    if let Ok(p) = std::env::var(env) {
        return Ok(p.into_bytes());
    }
    if !std::io::stdin().is_terminal() {
        bail!("no passphrase: set {env}, pass {flag}, or run on a terminal to be asked");
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
