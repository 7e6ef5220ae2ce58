//! Multi-process cluster harness; the tests live in tests/.
