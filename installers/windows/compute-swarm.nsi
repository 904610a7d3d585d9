; The Windows installer of the seller's app: per user, no administrator rights (it installs into
; %LOCALAPPDATA%\Programs\compute-swarm), a Start-menu entry, start at login (the app's own setting,
; on by default: desktop/autostart.py writes HKCU\...\Run on its first start), and an uninstaller in
; Apps & features that can also remove the engine runtime, the node's data and its settings.
;
; Built by installers/windows/package.sh (makensis, on Windows or Linux):
;   makensis -DVERSION=0.1.0 -DAPP_FOLDER=build\app-dist\compute-swarm-app -DOUTPUT=dist\...exe
; A download from a coordinator's sell page is named ...-setup.join-<tag>.exe: the app reads its
; swarm from that name in the Downloads folder on its first start (desktop/first_run.py), so this
; installer's bytes (and its signature) stay the same for every swarm.

Unicode true
RequestExecutionLevel user
SetCompressor /SOLID lzma
!include "MUI2.nsh"
!include "LogicLib.nsh"

!ifndef VERSION
  !error "define VERSION, e.g. -DVERSION=0.1.0"
!endif
!ifndef APP_FOLDER
  !error "define APP_FOLDER, the PyInstaller folder build\app-dist\compute-swarm-app"
!endif
!ifndef OUTPUT
  !define OUTPUT "compute-swarm-${VERSION}-windows-x86_64-setup.exe"
!endif

!define APP "compute-swarm"
!define EXECUTABLE "compute-swarm-app.exe"
!define UNINSTALL_KEY "Software\Microsoft\Windows\CurrentVersion\Uninstall\${APP}"

Name "${APP}"
OutFile "${OUTPUT}"
InstallDir "$LOCALAPPDATA\Programs\${APP}"
InstallDirRegKey HKCU "Software\${APP}" "InstallDir"
VIProductVersion "${VERSION}.0"
VIAddVersionKey "ProductName" "${APP}"
VIAddVersionKey "FileDescription" "${APP}: earn from your idle GPU"
VIAddVersionKey "FileVersion" "${VERSION}"
VIAddVersionKey "ProductVersion" "${VERSION}"
VIAddVersionKey "LegalCopyright" "Apache-2.0"

!define MUI_ICON "${APP_FOLDER}\icon.ico"
!define MUI_UNICON "${APP_FOLDER}\icon.ico"
!define MUI_FINISHPAGE_RUN "$INSTDIR\${EXECUTABLE}"
!define MUI_FINISHPAGE_RUN_TEXT "Open compute-swarm"
!insertmacro MUI_PAGE_WELCOME
!insertmacro MUI_PAGE_INSTFILES
!insertmacro MUI_PAGE_FINISH
!insertmacro MUI_UNPAGE_CONFIRM
!insertmacro MUI_UNPAGE_COMPONENTS
!insertmacro MUI_UNPAGE_INSTFILES
!insertmacro MUI_LANGUAGE "English"

Section "compute-swarm"
  ; A running app holds its files: ask it to quit first (a second start shows its window instead).
  nsExec::Exec 'taskkill /IM "${EXECUTABLE}" /T'
  Sleep 1000
  RMDir /r "$INSTDIR"
  SetOutPath "$INSTDIR"
  File /r "${APP_FOLDER}\*.*"
  WriteUninstaller "$INSTDIR\uninstall.exe"
  CreateDirectory "$SMPROGRAMS\${APP}"
  CreateShortcut "$SMPROGRAMS\${APP}\${APP}.lnk" "$INSTDIR\${EXECUTABLE}"
  CreateShortcut "$SMPROGRAMS\${APP}\Uninstall ${APP}.lnk" "$INSTDIR\uninstall.exe"
  WriteRegStr HKCU "Software\${APP}" "InstallDir" "$INSTDIR"
  WriteRegStr HKCU "${UNINSTALL_KEY}" "DisplayName" "${APP}"
  WriteRegStr HKCU "${UNINSTALL_KEY}" "DisplayVersion" "${VERSION}"
  WriteRegStr HKCU "${UNINSTALL_KEY}" "Publisher" "compute-swarm"
  WriteRegStr HKCU "${UNINSTALL_KEY}" "DisplayIcon" "$INSTDIR\${EXECUTABLE}"
  WriteRegStr HKCU "${UNINSTALL_KEY}" "UninstallString" '"$INSTDIR\uninstall.exe"'
  WriteRegDWORD HKCU "${UNINSTALL_KEY}" "NoModify" 1
  WriteRegDWORD HKCU "${UNINSTALL_KEY}" "NoRepair" 1
SectionEnd

Section "un.compute-swarm (the app)" UNINSTALL_APP
  SectionIn RO
  nsExec::Exec 'taskkill /IM "${EXECUTABLE}" /T'
  Sleep 1000
  RMDir /r "$INSTDIR"
  RMDir /r "$SMPROGRAMS\${APP}"
  DeleteRegValue HKCU "Software\Microsoft\Windows\CurrentVersion\Run" "${APP}"
  DeleteRegKey HKCU "${UNINSTALL_KEY}"
  DeleteRegKey HKCU "Software\${APP}"
SectionEnd

; Off by default: a reinstall keeps the fetched engine (gigabytes) and the node's identity and earnings.
Section /o "un.Engine runtime, jobs, cached models and settings" UNINSTALL_DATA
  ; platformdirs' folders on Windows (desktop/runtime/this_machine.py, desktop/settings.py).
  RMDir /r "$LOCALAPPDATA\${APP}"
  RMDir /r "$APPDATA\${APP}"
SectionEnd
