//! `tidemark-agent`: see the crate docs of `tidemark_agent`.

fn main() -> std::process::ExitCode {
    tidemark_agent::cli::main()
}
