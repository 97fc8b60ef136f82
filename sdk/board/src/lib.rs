//! jetvlm-board (being built).
