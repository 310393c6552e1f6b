//! The repository: where objects live and how each one is framed.

pub mod backup;
pub mod chain;
pub mod frame;
pub mod layout;
pub mod records;
pub mod seal;
