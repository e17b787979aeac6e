# A stand-in for a Slicer build's SlicerConfig.cmake, for Testing/slicer/test_installed_layout.py only: it gives
# the extension's CMakeLists.txt the variables and macros it uses, with the install layout of Slicer's own
# slicerMacroBuildScriptedModule (scripts and resources keep their path relative to the module's source folder,
# under lib/Slicer-X.Y/qt-scripted-modules). No Slicer, no compiler needed: `cmake --install` then lays out
# exactly the files the CMake lists install.
set(Slicer_FOUND TRUE)
set(Slicer_VERSION_MAJOR 5)
set(Slicer_VERSION_MINOR 10)
set(Slicer_USE_FILE ${CMAKE_CURRENT_LIST_DIR}/UseSlicer.cmake)
set(Slicer_QTSCRIPTEDMODULES_LIB_DIR lib/Slicer-5.10/qt-scripted-modules)
set(Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR lib/Slicer-5.10/qt-scripted-modules)
set(Slicer_EXTENSION_GENERATE_CONFIG ${CMAKE_CURRENT_LIST_DIR}/Empty.cmake)
set(Slicer_EXTENSION_CPACK ${CMAKE_CURRENT_LIST_DIR}/Empty.cmake)
