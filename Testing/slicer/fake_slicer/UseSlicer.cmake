# Stand-ins for the Slicer macros the extension calls (see SlicerConfig.cmake in this folder).
macro(slicerMacroBuildScriptedModule)
  cmake_parse_arguments(_SM "WITH_GENERIC_TESTS;WITH_SUBDIR;VERBOSE" "NAME" "SCRIPTS;RESOURCES" ${ARGN})
  foreach(_f IN LISTS _SM_SCRIPTS _SM_RESOURCES)
    if(NOT EXISTS ${CMAKE_CURRENT_SOURCE_DIR}/${_f} AND EXISTS ${CMAKE_CURRENT_SOURCE_DIR}/${_f}.py)
      set(_f ${_f}.py)
    endif()
    if(NOT EXISTS ${CMAKE_CURRENT_SOURCE_DIR}/${_f})
      message(FATAL_ERROR "slicerMacroBuildScriptedModule given nonexistent file '${_f}'")
    endif()
    get_filename_component(_d ${_f} DIRECTORY)
    install(FILES ${CMAKE_CURRENT_SOURCE_DIR}/${_f}
      DESTINATION ${Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR}/${_d} COMPONENT RuntimeLibraries)
  endforeach()
endmacro()

macro(slicer_add_python_unittest)
endmacro()
