//! jetvlm-cuda (being built).
