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
# Open MPI's mpirun names the process ("Process name: [[jobid,1]]", "Exit
# code: 3"); MPICH's Hydra (4.0) ends the job with the rank's status but
# names no rank, so there only the status is checked.
if(OPEN_MPI)
  if(NOT all MATCHES "Process name: \\[\\[[0-9]+,1\\]")
    message(FATAL_ERROR "mpirun's report does not name rank 1:\n${all}")
  endif()
  message(STATUS "mpirun ended the job (status ${rc}) naming rank 1")
else()
  message(STATUS "the launcher ended the job (status ${rc})")
endif()
