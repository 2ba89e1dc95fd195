# cmake -DBUILD_DIR=.. -DSOURCE_DIR=.. -DGENERATOR=.. -DCXX=.. -DCONFIG=.. -P consumer-test.cmake
# Installs the build tree into a private prefix, then configures, builds and
# runs a separate project that uses it through find_package(semoe).
set(prefix "${BUILD_DIR}/consumer-prefix")
set(build "${BUILD_DIR}/consumer-build")
file(REMOVE_RECURSE "${prefix}" "${build}")

function(step)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc)
  if(NOT rc EQUAL 0)
    list(JOIN ARGN " " cmd)
    message(FATAL_ERROR "consumer test: '${cmd}' failed (${rc})")
  endif()
endfunction()

if(NOT CONFIG)
  set(CONFIG Release)
endif()
step("${CMAKE_COMMAND}" --install "${BUILD_DIR}" --prefix "${prefix}" --config "${CONFIG}")
step("${CMAKE_COMMAND}" -S "${SOURCE_DIR}" -B "${build}" -G "${GENERATOR}"
     "-DCMAKE_CXX_COMPILER=${CXX}" "-DCMAKE_BUILD_TYPE=${CONFIG}" "-DCMAKE_PREFIX_PATH=${prefix}")
step("${CMAKE_COMMAND}" --build "${build}" --config "${CONFIG}")
file(GLOB exe "${build}/semoe_consumer" "${build}/${CONFIG}/semoe_consumer*")
step(${exe})
