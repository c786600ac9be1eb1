//! The `smsgw` binary: everything lives in the library (see `smsgw::cli`).

#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    smsgw::cli::main()
}
