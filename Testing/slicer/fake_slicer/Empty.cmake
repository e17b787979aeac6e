# intentionally empty (stand-in for Slicer's extension config / CPack includes)
