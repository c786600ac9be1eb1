//! The `smsgw` binary: everything lives in the library (see `smsgw::cli`).

fn main() -> std::process::ExitCode {
    smsgw::cli::main()
}
