# cmake -DCXX=<compiler> -DSOURCE=<file.cpp> -DINCLUDES=<dir|dir...> -P failtest.cmake
# Passes only if SOURCE fails to compile and the diagnostics match every
# "// expect: <regex>" line of SOURCE.
file(STRINGS "${SOURCE}" expects REGEX "^[ \t]*// expect: ")
if(NOT expects)
  message(FATAL_ERROR "${SOURCE}: no '// expect: <regex>' line")
endif()
string(REPLACE "|" ";" includes "${INCLUDES}")
list(TRANSFORM includes PREPEND "-I")
execute_process(COMMAND "${CXX}" -std=c++20 -fsyntax-only ${includes} "${SOURCE}"
                RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE out)
if(rc EQUAL 0)
  message(FATAL_ERROR "${SOURCE}: compiled, but must not")
endif()
foreach(line IN LISTS expects)
  string(REGEX REPLACE "^[ \t]*// expect: *" "" regex "${line}")
  if(NOT out MATCHES "${regex}")
    message(FATAL_ERROR "${SOURCE}: failed to compile, but not with /${regex}/:\n${out}")
  endif()
endforeach()
message(STATUS "${SOURCE}: rejected as expected")
