# FindOpenBLAS: the OpenBLAS CBLAS interface as the imported target OpenBLAS::OpenBLAS.
# Debian's OpenBLASConfig.cmake only sets variables, and its plain <cblas.h> is an
# alternatives link that may point at netlib's, so look for OpenBLAS's own header
# (next to openblas_config.h: semoe uses blasint and openblas_set_num_threads).
find_path(OpenBLAS_INCLUDE_DIR NAMES openblas_config.h
          PATH_SUFFIXES openblas-pthread openblas openblas-openmp openblas-serial)
find_library(OpenBLAS_LIBRARY NAMES openblas)

include(FindPackageHandleStandardArgs)
find_package_handle_standard_args(OpenBLAS REQUIRED_VARS OpenBLAS_LIBRARY OpenBLAS_INCLUDE_DIR)
mark_as_advanced(OpenBLAS_INCLUDE_DIR OpenBLAS_LIBRARY)

if(OpenBLAS_FOUND AND NOT TARGET OpenBLAS::OpenBLAS)
  add_library(OpenBLAS::OpenBLAS UNKNOWN IMPORTED)
  set_target_properties(OpenBLAS::OpenBLAS PROPERTIES
    IMPORTED_LOCATION "${OpenBLAS_LIBRARY}"
    INTERFACE_INCLUDE_DIRECTORIES "${OpenBLAS_INCLUDE_DIR}")
endif()
