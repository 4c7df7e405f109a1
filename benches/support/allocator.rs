//! The binary's allocator (`src/main.rs`), so that a bench running a role in its own process
//! measures what ships: without it the in-process benches measured glibc's malloc, which the
//! binary does not use.

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
