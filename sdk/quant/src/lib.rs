//! jetvlm-quant (being built).
