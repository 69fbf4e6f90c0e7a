//! The plugin sandbox of a build without the `wasm-plugins` feature, for boards whose flash has
//! no room for the `wasmi` interpreter (the MIPS build: see cross/README.md). Same interface as
//! `wasm.rs`, but every module is refused when it is injected (or, for one injected before an
//! upgrade, when it runs) with an error that says why: never silently missing.

use std::convert::Infallible;
use std::sync::Arc;

use super::run::{End, Job};

/// Why WebAssembly plugins are refused.
pub const UNAVAILABLE: &str = "this lightning-rod was built without WebAssembly plugins (cargo feature \
                               `wasm-plugins`): use a process or python plugin, or a build with that feature";

#[derive(Debug, Default)]
pub struct Sandbox;

/// A compiled module: there is none, since [`Sandbox::compile`] always refuses.
#[derive(Clone)]
pub struct Module(Infallible);

impl Sandbox {
    pub fn new() -> Sandbox {
        Sandbox
    }

    pub fn compile(&self, _bytes: &[u8]) -> Result<Module, String> {
        Err(UNAVAILABLE.into())
    }

    pub fn run(&self, module: &Module, _job: Arc<Job>) -> End {
        match module.0 {}
    }
}
