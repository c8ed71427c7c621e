// Intentionally empty: this crate only pins host versions.
