"""Load and write bytes: tensor names, files and layouts; never arithmetic."""
