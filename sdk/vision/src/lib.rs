//! jetvlm-vision (being built).
