//! jetvlm-camera (being built).
