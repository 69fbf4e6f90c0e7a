//! `s4t completions bash|zsh|fish`: shell completion scripts generated from the command line
//! definition (clap_complete), so they never drift from it.

use clap::{Args, CommandFactory, ValueEnum};
use clap_complete::Shell as Gen;

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Shell {
    Bash,
    Zsh,
    Fish,
}

#[derive(Args, Debug)]
#[command(after_help = "Install:
  bash: s4t completions bash > /etc/bash_completion.d/s4t   (or ~/.local/share/bash-completion/completions/s4t)
  zsh:  s4t completions zsh > ~/.zfunc/_s4t   (with fpath+=~/.zfunc before compinit)
  fish: s4t completions fish > ~/.config/fish/completions/s4t.fish")]
pub struct CompletionsArgs {
    pub shell: Shell,
}

pub fn print_completions(shell: Shell) {
    let generator = match shell {
        Shell::Bash => Gen::Bash,
        Shell::Zsh => Gen::Zsh,
        Shell::Fish => Gen::Fish,
    };
    let mut cmd = crate::cli::Cli::command();
    clap_complete::generate(generator, &mut cmd, "s4t", &mut std::io::stdout());
}
