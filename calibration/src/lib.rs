//! jetvlm-calibration (being built).
