//! Cache node of one site.
