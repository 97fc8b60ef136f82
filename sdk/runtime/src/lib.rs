//! jetvlm-runtime (being built).
