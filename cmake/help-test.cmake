# ctest -P script: PROGRAM --help must print its usage to stdout, nothing to
# stderr, and exit 0.
execute_process(COMMAND ${PROGRAM} --help RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err TIMEOUT 60)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "${PROGRAM} --help exited with ${rc} (expected 0); stderr: ${err}")
endif()
if(NOT out MATCHES "usage: ")
  message(FATAL_ERROR "${PROGRAM} --help printed no 'usage: ' line to stdout; it printed:\n${out}")
endif()
if(NOT err STREQUAL "")
  message(FATAL_ERROR "${PROGRAM} --help wrote to stderr:\n${err}")
endif()
