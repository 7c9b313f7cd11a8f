//! The `touchline` binary: everything lives in the library; see `cli`.
#![forbid(unsafe_code)]

/// The engine allocates and frees small values (rule states, keys,
/// records) at a high rate on one writer thread; mimalloc's thread-local
/// free lists spend about half what glibc's malloc does on that (see the
/// engine benchmark in the README).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    touchline::cli::main()
}
