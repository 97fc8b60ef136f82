//! jetvlm-kvcache (being built).
