"""GPU (NVML) and process (psutil) sampling. Call from a thread, about once a second."""
