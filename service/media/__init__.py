"""Media input: decoding and segmenting conversation audio/video."""
