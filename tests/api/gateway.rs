//! (gateway tests to come)
