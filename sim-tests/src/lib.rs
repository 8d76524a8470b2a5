//! Scenario, seed and mutation tests live in tests/.
