//! The container suite under runsc.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "container/mod.rs"]
mod container;
use container::*;

#[path = "container/cases.rs"]
mod cases;

container_suite!(airlock::container::ContainerRuntime::Runsc);
