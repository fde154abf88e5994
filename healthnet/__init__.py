"""healthNET command line, demo orchestration and embedded broker."""
