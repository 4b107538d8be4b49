//! Workflows triggered by merges (issue 5). So far: the definition format,
//! parsed and checked ([`def`]); matching, runs and effects come next.

pub mod def;
