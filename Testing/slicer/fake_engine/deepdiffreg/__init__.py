"""A stand-in engine for the controller tests (put fake_engine/ first on the child's PYTHONPATH): speaks the
progress protocol of the real one and copies a prepared result folder. FAKE_ENGINE_MODE picks the behaviour."""
