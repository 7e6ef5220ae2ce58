//! Object store layer: store URLs, the block codec and the object key layout.
