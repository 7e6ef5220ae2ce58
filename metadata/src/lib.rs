//! Elea metadata service.
