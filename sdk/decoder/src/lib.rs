//! jetvlm-decoder (being built).
