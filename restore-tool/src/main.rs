//! `tidemark-restore`: see the crate docs of `tidemark_restore`.

fn main() -> std::process::ExitCode {
    tidemark_restore::cli::main()
}
