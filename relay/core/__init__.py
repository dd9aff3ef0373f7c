"""The shared vocabulary of every stage: typed values, the error hierarchy, header bytes. No I/O."""
