//! One integration-test binary: real TLS on loopback, real redb files and
//! export trees in temp dirs, real `izo serve` processes killed with SIGKILL.

mod capture;
mod confine;
mod crash;
mod devices;
mod fullcache;
mod harness;
mod hostile;
mod mount;
mod mtime;
mod offline;
mod ops;
mod owners;
mod partition;
mod passthrough;
mod posix;
mod replay;
mod retention;
mod rollback;
mod security;
mod setgid;
mod sigkill;
mod space;
mod wire;
