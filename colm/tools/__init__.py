"""Tools over the library that no run needs: dataset statistics (dataset_info). Scripts in scripts/ are their
command lines."""
