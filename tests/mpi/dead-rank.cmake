# Rank 1 of 2 exits with status 3 while rank 0 waits in an all_reduce: the
# launcher must end the job (non-zero) and say which process it was.
execute_process(COMMAND ${MPIEXEC} ${NP_FLAG} 2 ${PROGRAM} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err
                TIMEOUT 100)
set(all "${out}${err}")
if(rc EQUAL 0)
  message(FATAL_ERROR "the job ended with status 0 although rank 1 exited with 3:\n${all}")
endif()
if(NOT all MATCHES "rank 1 exits on purpose")
  message(FATAL_ERROR "rank 1 never ran:\n${all}")
endif()
# Open MPI: "Process name: [[jobid,1],...]" and "Exit code: 3"; MPICH: "rank 1 ... exit code 3".
if(NOT all MATCHES "(Process name: \\[\\[[0-9]+,1\\]|rank 1[^\n]*(exit|EXIT))")
  message(FATAL_ERROR "the launcher's report does not name rank 1:\n${all}")
endif()
message(STATUS "the launcher ended the job (status ${rc}) naming rank 1")
